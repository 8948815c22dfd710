"""Hostile params.yaml, generated (issue 32): every key, type and path form; one line or a clean load, never a
traceback, nothing created outside the case's folder. benchmarks/fuzz.py runs thousands of these."""

import itertools

from fuzz_params import check_case, hostile_params
from hypothesis import HealthCheck, given, settings

COUNTER = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(hostile_params())
def test_hostile_params_load_or_fail_in_one_line(tmp_path_factory, params):
    folder = tmp_path_factory.mktemp("fuzz") / f"case{next(COUNTER)}"
    problem = check_case(folder, params)
    assert problem is None, problem
