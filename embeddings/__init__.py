"""TorchRec ID tables, the sharding planner / DMP wrapper and LEMUR's sharded memory bank."""
