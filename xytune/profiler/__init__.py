"""The profiler: probe a device, sweep primitives into a Parquet cost table, read it back as a cost model.

Data flow: devices -> primitives (the one registry) -> probe -> timing -> sweep (with calibrate and peaks)
-> table -> cost_model. The profiler never imports the runtime.
"""
