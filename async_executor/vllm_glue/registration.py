"""The `vllm.general_plugins` entry point: names and flags, nothing else.

vLLM runs `register()` once in every process it starts (front end, EngineCore,
workers) and, for `vllm serve`, before it builds the argument parser. It:
- teaches `Executor.get_class` the short name `async_executor`, and turns an
  unknown short name into an error that lists the valid ones;
- adds `--executor NAME` to vLLM's engine flags (the same setting as
  `--distributed-executor-backend`);
- refuses, in the front end, what the pipeline cannot run
  (`compatibility.py`): `EngineArgs.create_engine_config` is where every
  front end (`LLM`, `vllm serve`, `AsyncLLM.from_engine_args`) builds the
  config, before any engine process starts; the check runs on the arguments
  before vLLM's own validation and again on the config vLLM resolved;
- with `ASYNC_EXECUTOR_TRACE=1`, installs the step tracer (`tracing.py`), and
  with `ASYNC_EXECUTOR_ENGINE_PROFILE=1` the engine's profile methods;
- has new pipeline counters exported for `/metrics` (`metrics.py`; the
  module is imported only when an engine creates its counters).
All wrap vLLM functions by delegation; nothing in vLLM's files changes.
Importing this module must stay cheap: it runs in every vLLM process.
"""

from __future__ import annotations

import argparse
from typing import Any

EXECUTOR_NAME = "async_executor"
SHORT_NAMES = (EXECUTOR_NAME, "async-executor")
VLLM_BUILTIN_EXECUTORS = ("mp", "uni", "ray", "external_launcher")
_MARK = "_async_executor_wrapped"


class UnknownExecutorError(ValueError):
    pass


def valid_executor_names() -> list[str]:
    return [*VLLM_BUILTIN_EXECUTORS, EXECUTOR_NAME]


def check_executor_name(name: str) -> None:
    """Raise a clear error for a short name that is neither vLLM's nor ours."""
    if name in SHORT_NAMES or name in VLLM_BUILTIN_EXECUTORS or "." in name:
        return
    raise UnknownExecutorError(
        f"unknown executor {name!r}; valid executors: "
        f"{', '.join(valid_executor_names())}, or the import path of a "
        "vllm.v1.executor.Executor subclass (package.module.Class)"
    )


def _wrap_get_class() -> None:
    from vllm.v1.executor.abstract import Executor

    original = Executor.get_class
    if getattr(original, _MARK, False):
        return

    def get_class(vllm_config: Any) -> Any:
        backend = vllm_config.parallel_config.distributed_executor_backend
        if not isinstance(backend, str) or backend in VLLM_BUILTIN_EXECUTORS:
            return original(vllm_config)
        check_executor_name(backend)
        if backend in SHORT_NAMES:
            # The short name picks the executor class from the stage setting.
            from async_executor.vllm_glue.engine_config import executor_class_for

            return executor_class_for(vllm_config)
        try:
            return original(vllm_config)
        except (ImportError, AttributeError) as exc:
            raise UnknownExecutorError(
                f"cannot import executor {backend!r}: {exc}; valid executors: "
                f"{', '.join(valid_executor_names())}, or an importable "
                "package.module.Class"
            ) from exc

    setattr(get_class, _MARK, True)
    Executor.get_class = staticmethod(get_class)  # type: ignore[method-assign]


def _wrap_cli_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args
    if getattr(original, _MARK, False):
        return

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = original(parser, *args, **kwargs)
        if not any("--executor" in a.option_strings for a in parser._actions):
            parser.add_argument(
                "--executor",
                dest="distributed_executor_backend",
                metavar="NAME",
                default=argparse.SUPPRESS,
                help=(
                    "Executor to run the model with: "
                    f"{', '.join(valid_executor_names())}, or the import path "
                    "of an Executor subclass. Same setting as "
                    "--distributed-executor-backend. Added by async_executor."
                ),
            )
        return parser

    setattr(add_cli_args, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]


def _wrap_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _MARK, False):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        from async_executor.vllm_glue import compatibility

        if (asked := compatibility.deployment_of_engine_args(self)) is not None:
            compatibility.refuse(asked)
        config = original(self, *args, **kwargs)
        if (resolved := compatibility.deployment_of_config(config)) is not None:
            compatibility.refuse(resolved)
        return config

    setattr(create_engine_config, _MARK, True)
    EngineArgs.create_engine_config = create_engine_config  # type: ignore[method-assign]


def _start_metrics_export(config: object, counters: Any) -> Any:
    from async_executor.vllm_glue.metrics import start_export

    return start_export(config, counters)


def register() -> None:
    _wrap_get_class()
    _wrap_cli_args()
    _wrap_create_engine_config()
    from async_executor.pipeline.counters import on_counters_created

    on_counters_created(_start_metrics_export)
    from async_executor import tracing

    if tracing.enabled():
        tracing.install()
    if tracing.engine_profiler_enabled():
        tracing.install_engine_profiler()
