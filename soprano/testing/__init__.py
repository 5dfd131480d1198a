"""Tools for testing and benchmarking without the published weights."""
