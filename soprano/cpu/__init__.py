"""The native backend's CPU side: the compiled kernels (csrc/, built by `kernels`) and the weight
storages that feed them or stand in for them (`linear`), and the thread settings for a host shared
with other work (`threads`, applied when soprano is imported, so this package imports no torch)."""
