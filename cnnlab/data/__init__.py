"""Datasets: readers for each format, the in-memory container, batches."""
