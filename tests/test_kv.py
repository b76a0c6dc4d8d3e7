"""Key/value caches: the shared-prefix trick is exact, and only runtime/kv.py speaks the cache API."""

import re
from pathlib import Path

import pytest
import torch

import lmscalpel
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.runtime.kv import (
    cache_fits,
    cache_kv,
    new_cache,
    run_after,
    run_body,
    run_prefix,
)
from lmscalpel.runtime.layers import from_layer
from lmscalpel.testing import tiny_model
from lmscalpel.tokens import encode_prompt

TEXT = "The capital of Japan is Tokyo. The capital of Italy is Rome. "


def _rows(lm, prefix_text, tails):
    """Right-padded rows that share the tokens of ``prefix_text``: (ids, mask, prefix length)."""
    shared = encode_prompt(lm, prefix_text)
    seqs = [shared + lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in tails]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    return ids, mask, len(shared)


@pytest.mark.parametrize("shared", [True, False])
def test_columns_after_a_prefix_equal_one_pass(any_tiny, shared):
    lm = any_tiny
    ids, mask, p = _rows(lm, TEXT, ["Paris is in", "Apple was founded by Steve", "x"])
    with torch.no_grad():
        full = run_body(lm, ids, mask).hidden
        rows = 1 if shared else ids.shape[0]
        prefix = run_prefix(lm, ids[:rows, :p], mask[:rows, :p])
        kept = [(k.clone(), v.clone()) for k, v in prefix.kv]
        for _ in range(2):  # the prefix serves any number of passes, unchanged
            tail = run_after(lm, prefix, ids[:, p:], mask, rows=ids.shape[0])
            torch.testing.assert_close(tail.hidden, full[:, p:], atol=1e-5, rtol=0)
        torch.testing.assert_close(prefix.hidden.expand(3, -1, -1), full[:, :p], atol=1e-5, rtol=0)
    assert all(
        torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(prefix.kv, kept)
    )


def test_a_prefix_longer_than_the_sliding_window_is_still_exact():
    lm = tiny_model("gemma3_text")
    window = lm.adapter.sliding_window
    ids, mask, p = _rows(lm, TEXT * 4, ["Paris is in", "Apple was founded by"])
    assert window and p > window  # the sliding layers keep only the last window - 1 columns
    assert not cache_fits(lm, p) and cache_fits(lm, window - 1)
    with torch.no_grad():
        full = run_body(lm, ids, mask).hidden
        prefix = run_prefix(lm, ids[:1, :p], mask[:1, :p])
        assert cache_kv(run_body(lm, ids[:1, :p], use_cache=True).cache, p) is None
        tail = run_after(lm, prefix, ids[:, p:], mask, rows=2)
    torch.testing.assert_close(tail.hidden, full[:, p:], atol=1e-5, rtol=0)


def test_a_model_without_a_window_fits_any_width(tiny):
    assert tiny.adapter.sliding_window is None and cache_fits(tiny, 10**6)


def test_left_out_layers_are_placeholders_that_no_run_layer_may_read(tiny):
    a = tiny.adapter
    ids = torch.tensor([encode_prompt(tiny, TEXT)])
    p = 5
    with torch.no_grad():
        full = run_body(tiny, ids).hidden
        kv = cache_kv(run_body(tiny, ids[:, :p], use_cache=True).cache, p)
        name = a.layer_name(2)
        with tap(tiny.model, {name: Tap(input=True)}) as seen:
            run_body(tiny, ids)
        # layers 2..3 run from the hidden state: the others may be left out
        upper = new_cache(tiny, {2: kv[2], 3: kv[3]})
        assert upper.get_seq_length() == p  # positions and masks are sized right
        with from_layer(tiny, 2, seen[name].input[:, p:]):
            resumed = run_body(tiny, ids[:, p:], cache=upper).hidden
        torch.testing.assert_close(resumed, full[:, p:], atol=1e-5, rtol=0)
        # a layer that runs with a placeholder gives NaN, never a plausible number
        holed = new_cache(tiny, {i: kv[i] for i in (0, 2, 3)})
        assert run_body(tiny, ids[:, p:], cache=holed).hidden.isnan().all()


def test_only_the_kv_module_speaks_the_cache_api():
    """Nothing but runtime/kv.py names transformers' caches, passes ``use_cache`` to a model (other
    than through ``run_body``), or calls the transformer body itself."""
    root = Path(lmscalpel.__file__).parent
    words = re.compile(r"DynamicCache|past_key_values|cache_utils|batch_repeat_interleave|\.body\(")
    speaking = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        for line in path.read_text(encoding="utf-8").splitlines()
        if words.search(line) or ("use_cache" in line and "run_body(" not in line)
    }
    assert speaking == {"runtime/kv.py"}
