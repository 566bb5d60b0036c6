"""The partitioner: exact pipeline partitioning under a cost model, baselines and bounds."""
