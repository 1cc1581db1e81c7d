"""Graph rewrites that prepare a model for onnxruntime's transformer fusions (the fuse pass): attention geometry and form."""
