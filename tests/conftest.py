import os
import threading
import time

import psutil
import pytest
import sklearn  # noqa: F401 - see below
import torch._dynamo  # noqa: F401 - see below
import tqdm

# The pretrained encoder is read from site-packages; nothing may reach for a hub. The CLI sets
# these too when it is called in-process, so they are set for every test alike.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# tqdm (transformers' loading bars) starts a process-wide monitor thread with its first bar, which
# outlives any test; without it the bars work alike.
tqdm.tqdm.monitor_interval = 0

# scikit-learn (KMP_*) and torch's compiler (TORCHINDUCTOR_CACHE_DIR) set environment variables
# when first imported; imported above, before any test, they are not counted as a test's leak.

GRACE_S = 5.0  # a thread or process told to stop may take a moment to go


def _resource_tracker() -> int | None:
    """multiprocessing's resource tracker: started once per process by the first spawned pool and kept
    until the interpreter exits, by design, so not a test's leak."""
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def _children() -> dict[int, str]:
    found = {}
    tracker = _resource_tracker()
    for child in psutil.Process().children(recursive=True):
        if child.pid == tracker:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found[child.pid] = " ".join(child.cmdline())[:200]
        except psutil.NoSuchProcess:
            continue
    return found


def _compile_pool_threads() -> set[threading.Thread]:
    """The workers of torch.compile's kernel-compiling pool: made once per process and kept for
    later compiles by design (``AsyncCompile.pool`` is cached), so not a test's leak."""
    from torch._inductor.async_compile import AsyncCompile

    return set(AsyncCompile.pool()._threads) if AsyncCompile.pool.cache_info().currsize else set()


def _threads() -> dict[int, str]:
    kept = _compile_pool_threads()
    return {
        t.ident: t.name
        for t in threading.enumerate()
        if t.is_alive() and t is not threading.main_thread() and t not in kept
    }


def _outlived(before: dict, now) -> dict:
    """What ``now()`` holds that ``before`` did not, once it has had ``GRACE_S`` to go away."""
    deadline = time.monotonic() + GRACE_S
    while (left := {k: v for k, v in now().items() if k not in before}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(autouse=True)
def _leaves_environment_and_process_group_as_found():
    """A test must leave os.environ as it found it, and no torch.distributed group joined."""
    before = dict(os.environ)
    yield
    import torch.distributed as dist

    keys = (before.keys() | os.environ.keys()) - {"PYTEST_CURRENT_TEST"}  # pytest's own
    changed = sorted(k for k in keys if before.get(k) != os.environ.get(k))
    for key in changed:
        if key in before:
            os.environ[key] = before[key]
        else:
            del os.environ[key]
    joined = dist.is_available() and dist.is_initialized()
    if joined:
        dist.destroy_process_group()
    assert not changed, f"the test left environment variables changed: {changed}"
    assert not joined, "the test left a torch.distributed process group joined"


@pytest.fixture(autouse=True, scope="module")
def _leaves_no_threads_or_child_processes():
    """A test module (its module-scoped fixtures, such as a server, included) must stop every
    thread and child process it started."""
    threads, children = _threads(), _children()
    yield
    left_threads = _outlived(threads, _threads)
    left_children = _outlived(children, _children)
    for pid in left_children:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            continue
    assert not left_children, f"the tests left child processes running: {left_children}"
    assert not left_threads, f"the tests left threads running: {sorted(left_threads.values())}"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """arch -> the folder of a tiny random Hugging Face checkpoint of it (forgeml.tiny_checkpoints),
    built once per test session."""
    from forgeml.tiny_checkpoints import tiny_checkpoint as build

    built: dict[str, object] = {}

    def folder(arch: str):
        if arch not in built:
            built[arch] = build(arch, tmp_path_factory.mktemp(f"hf-{arch}"))
        return built[arch]

    return folder
