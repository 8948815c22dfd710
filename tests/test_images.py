import numpy as np
import pytest
from factory import brain, cmyk_jpeg, encode, png16, rgba_png, truncated_jpeg
from PIL import Image

from brainmri.core.errors import ImageError
from brainmri.intake.decode import decode_bytes

LIMITS = {"max_pixels": 10_000_000, "max_side": 512}


@pytest.fixture
def arr():
    return brain(3, tumor=True)


def test_sixteen_bit_png_is_scaled_not_clipped(arr):
    dec = decode_bytes(png16(arr), **LIMITS)
    assert dec.mode.startswith("I") and dec.format == "PNG"
    got = np.asarray(dec.image)[..., 0]
    assert np.array_equal(got, arr)  # v*257 scaled back by 1/257 is exact


def test_rgba_is_composited_on_black(arr):
    got = np.asarray(decode_bytes(rgba_png(arr), **LIMITS).image)
    background = arr <= 20
    assert got[background].max() == 0  # transparent white became black, not white
    assert np.array_equal(got[~background][:, 0], arr[~background])


def test_palette_with_transparency_is_composited_on_black(arr):
    img = Image.fromarray(np.where(arr > 20, arr, 255).astype(np.uint8)).convert("P")
    idx = np.asarray(img)[0, 0]
    got = np.asarray(decode_bytes(encode(img, "PNG", transparency=int(idx)), **LIMITS).image)
    assert got[0, 0].tolist() == [0, 0, 0]


def test_cmyk_jpeg_becomes_rgb_with_the_right_tones(arr):
    dec = decode_bytes(cmyk_jpeg(arr), **LIMITS)
    assert dec.mode == "CMYK" and dec.image.mode == "RGB"
    gray = np.asarray(dec.image.convert("L"), dtype=float)
    assert np.corrcoef(gray.ravel(), arr.ravel())[0, 1] > 0.95  # not inverted


def test_png_named_jpg_is_detected_by_content(arr):
    dec = decode_bytes(encode(arr, "PNG"), **LIMITS)
    assert dec.format == "PNG"


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40), np.uint8)
    arr[:, :10] = 255  # bright left band, landscape
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn clockwise
    dec = decode_bytes(encode(img, "JPEG", exif=exif.tobytes(), quality=95), **LIMITS)
    assert dec.exif_rotated and dec.image.size == (20, 40)
    out = np.asarray(dec.image.convert("L"))
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the band moved to the top


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image at all", "not a recognised image"),
        ("truncated", "corrupt or truncated JPEG"),
    ],
)
def test_unusable_bytes_raise_with_a_reason(arr, data, reason):
    data = truncated_jpeg(arr) if data == "truncated" else data
    with pytest.raises(ImageError, match=reason):
        decode_bytes(data, **LIMITS)


def test_pixel_cap_and_downscale(arr):
    with pytest.raises(ImageError, match="over the cap ingest.max_pixels=100"):
        decode_bytes(encode(arr, "PNG"), max_pixels=100, max_side=512)
    big = np.zeros((300, 600), np.uint8)
    dec = decode_bytes(encode(big, "PNG"), max_pixels=10**7, max_side=150)
    assert dec.image.size == (150, 75) and (dec.width, dec.height) == (600, 300)


def test_closing_and_opening_match_scipys():
    """decode's shifted-AND morphology gives scipy's pixels (random blobs, strips and single rows included)."""
    from scipy import ndimage

    from brainmri.intake.decode import closing, opening

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 48, 2))
        mask = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 3)) > rng.uniform(0.3, 0.7)
        for k in (1, 2, 3):
            assert np.array_equal(closing(mask, k), ndimage.binary_closing(mask, iterations=k))
            assert np.array_equal(opening(mask, k), ndimage.binary_opening(mask, iterations=k))
