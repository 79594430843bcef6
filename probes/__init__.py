"""Everything that runs torch: workload builders, the train step, backends, the worker loop."""
