"""The forward-pass runtime every method is built from; nothing here names an architecture.

* :mod:`.hooks` — :func:`~.hooks.tap`, the one hook primitive (capture inputs/outputs, replace an
  output, keep gradients, stop early; always removed);
* :mod:`.layers` — :func:`~.layers.from_layer`, the one way to run the model from layer ``l``
  upward given the hidden state entering it (accelerate's hooks stay intact);
* :mod:`.kv` — the only module that speaks transformers' key/value-cache API, and the
  shared-prefix trick (:func:`~.kv.run_prefix`, :func:`~.kv.run_after`);
* :mod:`.stream` — the recorded residual stream and its replay check, built on the three above;
* :mod:`.distributed` — several processes on one job (torchrun): rank, shard, all-reduce, gather.
"""
