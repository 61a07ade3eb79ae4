"""What the pipeline cannot run is refused in the front end, before any
engine process starts, with one message naming the setting and what to do
instead (`vllm_glue/compatibility.py`); EngineCore checks again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from vllm import SamplingParams

from async_executor.settings import PipelineSettings
from async_executor.vllm_glue import compatibility
from async_executor.vllm_glue.compatibility import (
    IN_PROCESS_EXECUTOR,
    MULTIPROC_EXECUTOR,
    SHORT_NAME,
    Deployment,
    UnsupportedConfigError,
    deployment_of_config,
    unsupported,
)
from async_executor.vllm_glue.engine_config import apply_pipeline_config
from async_executor.vllm_glue.executor import AsyncExecutor
from tests.conftest import ENGINE_DEFAULTS, engine, generate, stats

NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
DEFAULT_EXECUTOR = "vLLM's default executor (leave out --executor / distributed_executor_backend)"


def _stage(stage: str) -> dict[str, Any]:
    return {"additional_config": {"async_executor": {"stage": stage}}}


# (engine arguments, what the message must say: the setting, then the way out)
REFUSED = [
    pytest.param(
        {"speculative_config": NGRAM},
        [
            "speculative decoding (speculative_config / --speculative-config, method 'ngram')",
            "remove the speculative config",
            DEFAULT_EXECUTOR,
        ],
        id="speculative-decoding",
    ),
    pytest.param(
        {"pipeline_parallel_size": 2},
        [
            "pipeline parallelism (pipeline_parallel_size / --pipeline-parallel-size = 2)",
            DEFAULT_EXECUTOR,
        ],
        id="pipeline-parallel",
    ),
    pytest.param(
        {"tensor_parallel_size": 2, **_stage("thread")},
        [
            "tensor parallelism (tensor_parallel_size / --tensor-parallel-size = 2)",
            "needs the device stage 'process'",
        ],
        id="tensor-parallel-thread-stage",
    ),
    pytest.param(
        {"prefill_context_parallel_size": 2},
        [
            "context parallelism (prefill_context_parallel_size / "
            "--prefill-context-parallel-size = 2)",
            DEFAULT_EXECUTOR,
        ],
        id="context-parallel",
    ),
    pytest.param(
        {"async_scheduling": False},
        [
            "async_scheduling=False (--no-async-scheduling)",
            'set overlap=false (additional_config {"async_executor": {"overlap": false}})',
        ],
        id="async-scheduling-off",
    ),
    pytest.param(
        {"distributed_executor_backend": AsyncExecutor, **_stage("process")},
        [
            "stage='process' runs the worker in its own process",
            "async_executor.vllm_glue.executor.AsyncMultiprocExecutor",
        ],
        id="process-stage-in-engine-process-executor",
    ),
    pytest.param(
        {
            "distributed_executor_backend": "async_executor.vllm_glue.executor."
            "AsyncMultiprocExecutor",
            **_stage("inline"),
        },
        [
            "stage='inline' runs the worker in the engine process",
            "async_executor.vllm_glue.executor.AsyncExecutor",
        ],
        id="inline-stage-in-worker-process-executor",
    ),
    pytest.param(
        {"tensor_parallel_size": 2, **_stage("thread"), "speculative_config": NGRAM},
        ["speculative decoding", "tensor parallelism"],
        id="every-problem-at-once",
    ),
]


@pytest.mark.e2e
@pytest.mark.parametrize("kwargs,message", REFUSED)
def test_llm_refuses_before_the_engine_starts(
    tiny_model: str, kwargs: dict[str, Any], message: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With vLLM's multiprocess engine an error raised in EngineCore reaches
    `LLM(...)` only as "Engine core initialization failed": our own error
    type here means the front end refused."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    args = {**ENGINE_DEFAULTS, "distributed_executor_backend": "async_executor", **kwargs}
    with pytest.raises(UnsupportedConfigError) as err:
        LLM(tiny_model, **args)
    text = str(err.value)
    assert text.startswith("async_executor cannot run this configuration:")
    for part in message:
        assert part in text, text


def test_other_executors_are_not_checked(tiny_model: str) -> None:
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(
        tiny_model, distributed_executor_backend="mp", speculative_config=NGRAM, max_model_len=256
    ).create_engine_config()
    assert config.speculative_config is not None


def _stock_config(tiny_model: str, **kwargs: Any) -> Any:
    """A VllmConfig that vLLM resolved for its own executor."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        tiny_model, distributed_executor_backend="mp", max_model_len=256, **kwargs
    ).create_engine_config()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        pytest.param({"pipeline_parallel_size": 2}, "pipeline parallelism", id="pipeline-parallel"),
        pytest.param({"speculative_config": NGRAM}, "speculative decoding", id="speculative"),
        pytest.param({"data_parallel_size": 2}, "data parallelism", id="data-parallel"),
    ],
)
def test_resolved_config_and_engine_core_refuse_too(
    tiny_model: str, kwargs: dict[str, Any], message: str
) -> None:
    """The checks on a VllmConfig: the front end's second look (after vLLM
    resolved the arguments) and EngineCore's, for engines built from a
    VllmConfig without EngineArgs."""
    config = _stock_config(tiny_model, **kwargs)
    deployment = deployment_of_config(config, MULTIPROC_EXECUTOR)
    assert deployment is not None
    assert any(message in p for p in unsupported(deployment))
    with pytest.raises(UnsupportedConfigError, match=message):
        apply_pipeline_config(config, PipelineSettings(), MULTIPROC_EXECUTOR)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"enable_lora": True}, id="lora"),
        pytest.param({"runner": "pooling"}, id="pooling"),
        pytest.param(
            {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
            id="kv-connector",
        ),
        pytest.param({"structured_outputs_config": {"backend": "xgrammar"}}, id="structured"),
        pytest.param({"enforce_eager": False}, id="graphs-or-eager"),
    ],
)
def test_supported_configurations_pass(tiny_model: str, kwargs: dict[str, Any]) -> None:
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        tiny_model, distributed_executor_backend="async_executor", max_model_len=256, **kwargs
    )
    config = args.create_engine_config()
    deployment = deployment_of_config(config)
    assert deployment is not None and unsupported(deployment) == []


def test_device_rule_and_tensor_parallel_stages() -> None:
    xpu = Deployment(executor=IN_PROCESS_EXECUTOR, stage_setting="auto", device="xpu")
    (problem,) = unsupported(xpu)
    assert "the device type is 'xpu'" in problem and DEFAULT_EXECUTOR in problem
    # Tensor parallelism runs on the process stage (one worker process per rank).
    assert frozenset({"process"}) == compatibility.TENSOR_PARALLEL_STAGES
    on_process = Deployment(MULTIPROC_EXECUTOR, "auto", "cuda", tensor_parallel_size=2)
    on_thread = Deployment(IN_PROCESS_EXECUTOR, "thread", "cuda", tensor_parallel_size=2)
    assert unsupported(on_process) == []
    (problem,) = unsupported(on_thread)
    assert "needs the device stage 'process'" in problem and "runs the 'thread' stage" in problem


def test_auto_stage_is_a_worker_process_on_every_device() -> None:
    """`stage="auto"` picks the worker-process stage on CPU and on one GPU
    (measured fastest on both; README, "Settings"), and the short executor
    name follows it to the multiprocess executor class. The in-process
    executor, selected by its class name, keeps its worker: on a thread on
    CPU, on the engine thread on CUDA."""
    assert compatibility.AUTO_STAGE == "process"
    assert compatibility._executor(SHORT_NAME, PipelineSettings()) == MULTIPROC_EXECUTOR
    # An explicit in-process stage still selects the in-process executor.
    inline = PipelineSettings(stage="inline")
    assert compatibility._executor(SHORT_NAME, inline) == IN_PROCESS_EXECUTOR
    for device, expected in (("cpu", "thread"), ("cuda", "inline")):
        assert compatibility.in_process_stage("auto", device) == expected
        assert Deployment(IN_PROCESS_EXECUTOR, "auto", device).stage == expected
        assert Deployment(MULTIPROC_EXECUTOR, "auto", device).stage == "process"


@pytest.mark.e2e
def test_pooling_model_runs(tiny_model: str) -> None:
    """Pooling models are allowed: they run (windows off) and embed exactly
    like the stock executor."""
    prompts = ["hello world", "the cat sat on the mat"]
    embeddings = []
    for ours in (False, True):
        with engine(tiny_model, ours=ours, runner="pooling") as llm:
            embeddings.append([o.outputs.embedding for o in llm.embed(prompts, use_tqdm=False)])
            if ours:
                assert stats(llm).batches_launched > 0
    assert embeddings[0] == embeddings[1]


def test_serve_front_end_refuses_data_parallelism(tiny_model: str) -> None:
    """`LLM(data_parallel_size=2)` is refused by vLLM itself; `vllm serve
    --data-parallel-size 2` builds its config like this, in the API server
    process, before it starts the engines."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", tiny_model, "--executor", "async_executor", "--data-parallel-size", "2"]
    )
    with pytest.raises(UnsupportedConfigError) as err:
        AsyncEngineArgs.from_cli_args(args).create_engine_config()
    text = str(err.value)
    assert "data parallelism (data_parallel_size / --data-parallel-size = 2)" in text, text
    assert "run one engine per replica" in text and DEFAULT_EXECUTOR in text, text


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "flags,message",
    [
        pytest.param(
            ["--pipeline-parallel-size", "2"],
            "pipeline parallelism (pipeline_parallel_size / --pipeline-parallel-size = 2)",
            id="pipeline-parallel",
        ),
        pytest.param(
            ["--data-parallel-size", "2"],
            "data parallelism (data_parallel_size / --data-parallel-size = 2)",
            id="data-parallel",
        ),
    ],
)
def test_vllm_serve_refuses_with_the_reason(
    tiny_model: str, flags: list[str], message: str
) -> None:
    """`vllm serve` exits at once with the message, before it starts an
    engine process (before this check, vLLM printed "Engine core
    initialization failed" for tensor parallelism, and started data-parallel
    engines)."""
    script = Path(sys.executable).parent / "vllm"
    out = subprocess.run(
        [str(script), "serve", tiny_model, "--executor", "async_executor",
         "--max-model-len", "256", "--dtype", "float32", *flags],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    assert "UnsupportedConfigError: async_executor cannot run this" in log, log[-3000:]
    assert message in log, log[-3000:]
    assert "EngineCore" not in log, log[-3000:]


@pytest.mark.e2e
def test_plain_configuration_still_runs(tiny_model: str) -> None:
    with engine(tiny_model, ours=True, settings={"decode_window": 4}) as llm:
        out = generate(llm, ["hello"], SamplingParams(temperature=0.0, max_tokens=8))
    assert len(out[0].outputs[0].token_ids) == 8
