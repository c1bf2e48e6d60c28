"""Redundant hotspot experts, in one place: EPLB placement (eplb.py), expert load statistics
(expert_load.py), the MoE layer with R >= E physical slots (redundant.py) and keeping its replicas
identical (replicas.py).

This package sits below model/, rollout/ and the trainer: it uses megatron-core's MoE layer and the
collectives of parallel/, never our model or engine code. model/provider.py builds the layer from it,
rollout/weight_export.py exports a slot under its logical expert, and the trainer syncs replica grads.
"""
