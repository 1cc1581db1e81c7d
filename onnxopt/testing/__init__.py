"""Support shared by the tests and the benchmarks: model builders, the conformance harness, OCR data."""
