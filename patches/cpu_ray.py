"""vLLM 0.32 and 0.33 on CPU: let the Ray executor (tensor parallel) and Ray data parallel start.

vLLM's CPU platform leaves ``ray_device_key`` empty and refuses Ray ("current
platform cpu does not support ray"). With the key set to ``"CPU"`` the rest
still assumes an accelerator; three parts fix that, each naming the releases
it was read against:

* ``V1_EXECUTOR_VLLM`` (0.32 only; 0.33 removed ``v1/executor/ray_executor.py``):
  the V1 executor asks Ray for a custom resource named "CPU" (Ray wants
  ``num_cpus``), and its worker looks its device ids up in Ray's accelerator
  ids (Ray has none for CPU).
* ``V2_EXECUTOR_VLLM`` (0.32 and 0.33, ``RayExecutorV2``, the default on both):
  the same two assumptions in ``_get_actor_resource_kwargs`` and
  ``RayWorkerProc.get_node_and_physical_gpu_ids``. The executor hands the ids
  to the workers as ``assigned_physical_gpu_ids``, which 0.33's ``CPUWorker``
  reads as its NUMA memory nodes (0.32's ignores them), so a worker reports
  the NUMA node of its first allowed CPU: the node ``CPUWorker`` binds anyway.
* ``DATA_PARALLEL_VLLM`` (0.32 and 0.33, ``--data-parallel-backend ray``):
  every engine is a Ray actor in a per-rank placement group of world_size
  worker bundles plus one control bundle for the engine actor
  (``v1/engine/utils.py``). On CPU the control bundle ``{"CPU": 1}`` looks like
  a worker bundle, so ``get_bundles_sorted_by_node`` returns world_size + 1
  bundles, the executor sizes its broadcast queue for world_size + 1 local
  readers, spawns world_size workers and waits for ever; it is limited to the
  first world_size bundles (the ones the executor spawns workers into). And
  ``create_dp_placement_groups`` counts world_size CPUs per rank where a rank
  needs world_size + 1, so with too few Ray CPUs the last group never schedules
  and start-up hangs; it now raises an error that says how many to start Ray with.

The worker classes below are what the Ray actors unpickle, and the plugin
applies this module in every vLLM process (the API server, each engine actor,
each worker), so the fixes reach all of them. Single node; pipeline
parallelism and user-supplied placement groups are not covered.
"""

from __future__ import annotations

import functools
import os
import threading

from . import check_target, vllm_release

V1_EXECUTOR_VLLM = ("0.32.0",)
V2_EXECUTOR_VLLM = ("0.32.0", "0.33.0")
DATA_PARALLEL_VLLM = ("0.32.0", "0.33.0")
TARGET_VLLM = ("0.32.0", "0.33.0")

_executor_world_size = threading.local()  # .value: world size of the RayExecutorV2 initialising in this thread

try:
    import ray
    from vllm.v1.executor.ray_executor_v2 import RayWorkerProc
except ImportError:  # no ray installed: nothing to patch
    ray = None
else:

    class CpuRayWorkerProc(RayWorkerProc):  # RayExecutorV2's worker
        def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
            from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

            return ray.get_runtime_context().get_node_id(), [max(get_allowed_cpu_list()[0].numa_node, 0)]

    try:
        from vllm.v1.executor.ray_utils import RayWorkerWrapper  # the V1 executor's worker, 0.32 only
    except ImportError:
        RayWorkerWrapper = None
    else:

        class CpuRayWorkerWrapper(RayWorkerWrapper):
            def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
                return ray.get_runtime_context().get_node_id(), []


class _RayWithCpuActors:
    """``ray`` as the V1 executor sees it, except that a "CPU" resource request becomes ``num_cpus``."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def remote(self, *args, **kwargs):
        resources = dict(kwargs.pop("resources", None) or {})
        if "CPU" in resources:
            kwargs["num_cpus"] = resources.pop("CPU")
        if resources:
            kwargs["resources"] = resources
        return self._module.remote(*args, **kwargs)


def _apply_v1_executor() -> None:
    check_target("cpu_ray", V1_EXECUTOR_VLLM, "check v1/executor/ray_executor.py's worker creation and its RayWorkerWrapper")
    from vllm.v1.executor import ray_executor

    if not isinstance(ray_executor.ray, _RayWithCpuActors):
        ray_executor.ray = _RayWithCpuActors(ray_executor.ray)
    ray_executor.RayWorkerWrapper = CpuRayWorkerWrapper
    os.environ.setdefault("VLLM_USE_RAY_COMPILED_DAG_CHANNEL_TYPE", "shm")  # its compiled DAG's channels


def _apply_v2_executor() -> None:
    check_target(
        "cpu_ray", V2_EXECUTOR_VLLM,
        "check RayExecutorV2._get_actor_resource_kwargs, RayWorkerProc.get_node_and_physical_gpu_ids and how "
        "CPUWorker reads assigned_physical_gpu_ids",
    )
    from vllm.v1.executor import ray_executor_v2

    # each actor sits in its placement-group bundle ({"CPU": 1}) with num_cpus=0 already
    ray_executor_v2.RayExecutorV2._get_actor_resource_kwargs = staticmethod(lambda: {"num_gpus": 0})
    ray_executor_v2.RayWorkerProc = CpuRayWorkerProc


def _worker_bundles_only(get_bundles_sorted_by_node):
    @functools.wraps(get_bundles_sorted_by_node)
    def first_world_size_bundles(placement_group):
        bundles = get_bundles_sorted_by_node(placement_group)
        world_size = getattr(_executor_world_size, "value", None)
        return bundles if world_size is None else bundles[:world_size]

    first_world_size_bundles.oprm_cpu_ray = True
    return first_world_size_bundles


def _with_world_size(init_executor):
    @functools.wraps(init_executor)
    def _init_executor(self) -> None:
        previous = getattr(_executor_world_size, "value", None)
        _executor_world_size.value = self.parallel_config.world_size
        try:
            return init_executor(self)
        finally:
            _executor_world_size.value = previous

    _init_executor.oprm_cpu_ray = True
    return _init_executor


def _enough_ray_cpus_first(create_dp_placement_groups):
    @functools.wraps(create_dp_placement_groups)
    def checked(vllm_config):
        from ray._private.state import available_resources_per_node

        parallel = vllm_config.parallel_config
        needed = parallel.data_parallel_size_local * (parallel.world_size + 1)
        master = "node:" + parallel.data_parallel_master_ip
        for resources in available_resources_per_node().values():
            if master in resources and resources.get("CPU", 0) < needed:
                raise ValueError(
                    f"Ray data parallel on CPU needs {needed} Ray CPUs on {parallel.data_parallel_master_ip} "
                    f"(data_parallel_size_local x (world_size + 1): one per worker and one per engine actor), "
                    f"found {resources.get('CPU', 0):g} available. Start Ray with more logical CPUs, e.g. "
                    f"`ray start --head --num-cpus {needed}` (or ray.init(num_cpus={needed})) and point vLLM "
                    f"at it with RAY_ADDRESS"
                )
        return create_dp_placement_groups(vllm_config)

    checked.oprm_cpu_ray = True
    return staticmethod(checked)


def _apply_data_parallel() -> None:
    check_target(
        "cpu_ray", DATA_PARALLEL_VLLM,
        "check v1/engine/utils.py's create_dp_placement_groups and _make_control_bundle, "
        "ray_utils.get_bundles_sorted_by_node and RayExecutorV2._init_executor",
    )
    from vllm.v1.engine.utils import CoreEngineActorManager
    from vllm.v1.executor import ray_executor_v2

    if not getattr(ray_executor_v2.get_bundles_sorted_by_node, "oprm_cpu_ray", False):
        ray_executor_v2.get_bundles_sorted_by_node = _worker_bundles_only(ray_executor_v2.get_bundles_sorted_by_node)
    executor = ray_executor_v2.RayExecutorV2
    if not getattr(executor._init_executor, "oprm_cpu_ray", False):
        executor._init_executor = _with_world_size(executor._init_executor)
    manager = CoreEngineActorManager
    if not getattr(manager.create_dp_placement_groups, "oprm_cpu_ray", False):
        manager.create_dp_placement_groups = _enough_ray_cpus_first(manager.create_dp_placement_groups)


def apply() -> None:
    check_target("cpu_ray", TARGET_VLLM, "check each part's targets in patches/cpu_ray.py")
    if ray is None:
        return
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.ray_device_key = "CPU"
    release = vllm_release()
    for targets, part in (
        (V1_EXECUTOR_VLLM, _apply_v1_executor),
        (V2_EXECUTOR_VLLM, _apply_v2_executor),
        (DATA_PARALLEL_VLLM, _apply_data_parallel),
    ):
        if release in targets:
            part()
