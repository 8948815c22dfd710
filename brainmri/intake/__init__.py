"""Data intake: decoding, archives, the head crop, duplicates, outliers, phantoms, preprocessing and the split's parts."""
