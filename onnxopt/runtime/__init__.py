"""onnxruntime plumbing: sessions (and the in-memory limit), data, generated feeds, validation
(with the noise floor), int8 kernel probes, latency, the machine's environment."""
