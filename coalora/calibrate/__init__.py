"""Base quantization calibration: empirical Fisher diagonals and the (layer, spec) cost table (METHOD.md §5).

    fisher   calibration_sequences  seeded token windows from the fine-tuning text
             fisher_diagonals       F_i = mean over sequences of (∂ loss_seq / ∂ W_i)²           (out, in) per layer
    costs    cost_tables            cost[i, c] = ‖√F_i ⊙ (W_i − W̃_i(c))‖²  and  ‖W_i − W̃_i(c)‖²  (n_layers, n_specs)
             layer_costs            one layer's row(s), every spec, by the sweep of ``coalora.quant.sweep``: exact,
                                    or estimated from ``sample_weights`` of its weights (``sample_segments``,
                                    ``sampled_sums``)
    cost_table CostTable            the stage's files (costs.safetensors + costs.json): the one writer and reader

The cost table and the storage table (``bits_per_param`` per spec, ``numel`` per layer) are all the
allocation's integer program needs. Time (benchmarks/calibrate_cost.md): exact ∝ parameters × 432 specs;
sampled ∝ parameters (the scales of every block) + layers × sample_weights × 432.

Nothing is imported here: a reader of the cost table (allocate, adapt) imports ``coalora.calibrate.cost_table`` alone.
"""
