"""The JSON/HTML report writer and its plots."""
