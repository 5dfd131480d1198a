"""The native backend's CPU side: the compiled kernels (csrc/, built by `kernels`) and the weight
storages that feed them or stand in for them (`linear`), and the thread settings for a host shared
with other work (`threads`, which soprano applies before torch loads, so it imports no torch at
its top)."""
