"""The names of a head's output layer, in a module of their own: evaluate finds them without importing TensorFlow
(brainmri.learn.calibration), and models builds heads with them."""

BINARY_OUTPUT = "tumour_probability"  # two classes: one sigmoid unit, P(positive_class)
MULTI_OUTPUT = "class_probabilities"  # N classes: one softmax unit per class, in ingest's label_names order
