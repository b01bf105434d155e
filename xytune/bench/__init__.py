"""`xytune bench ...`: benchmark drivers (kernels, runtime, engines, servers, profile) and the load client (`serve`)."""
