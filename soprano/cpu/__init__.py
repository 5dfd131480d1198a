"""The native backend's CPU side: the compiled kernels (csrc/, built by `kernels`) and the weight
storages that feed them or stand in for them (`linear`)."""
