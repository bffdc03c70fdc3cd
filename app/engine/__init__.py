"""Admission, batching and the model worker thread."""
