"""A fix for vLLM 0.32's CPU model runner: seeded sampling with chunked prefill.

When a prompt is prefilled in chunks, the runner still samples a token for
the partial chunk and discards it; to keep a seeded request's random stream
as if that sample never happened it rewinds the request's generator with
`set_offset(get_offset() - 4)`. That is a CUDA Philox API: a CPU generator
raises `RuntimeError: CPU Generator does not use offset` and the engine dies.

The fix saves the generator state of those rows before sampling and restores
it after, which is exactly what the rewind means, and hides those generators
from the rewind. It is installed on vLLM's V1 `CPUModelRunner` instance by
swapping its class for a subclass that adds only these two overrides.
patches/0002-cpu-generator-rewind.patch proposes the same change to vLLM.
"""

from __future__ import annotations

from typing import Any

import torch


class _SeededDiscardFix:
    discard_request_mask: Any
    input_batch: Any

    def _discarded_generators(self) -> dict[int, torch.Generator]:
        num_reqs = self.input_batch.num_reqs
        generators = self.input_batch.generators
        if not generators:
            return {}
        mask = self.discard_request_mask.np[:num_reqs]
        return {int(i): generators[int(i)] for i in mask.nonzero()[0] if int(i) in generators}

    def _sample(self, *args: Any, **kwargs: Any) -> Any:
        discarded = self._discarded_generators()
        saved = {i: g.get_state() for i, g in discarded.items()}
        try:
            return super()._sample(*args, **kwargs)  # type: ignore[misc]
        finally:
            for i, state in saved.items():
                discarded[i].set_state(state)

    def _bookkeeping_sync(self, *args: Any, **kwargs: Any) -> Any:
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i in self._discarded_generators()}
        try:
            return super()._bookkeeping_sync(*args, **kwargs)  # type: ignore[misc]
        finally:
            generators.update(hidden)


_FIXED: dict[type, type] = {}


def install_cpu_runner_fixes(runner: Any) -> bool:
    """Apply the fix to a V1 CPU model runner; False if not one."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    cls = type(runner)
    if not issubclass(cls, CPUModelRunner) or issubclass(cls, _SeededDiscardFix):
        return False
    fixed = _FIXED.get(cls)
    if fixed is None:
        fixed = _FIXED[cls] = type(cls.__name__, (_SeededDiscardFix, cls), {})
    runner.__class__ = fixed
    return True
