"""Integration fixtures: per test session, the stand-in model server and a real `llama stack run`
with this provider, both separate processes on free ports, driven through real clients."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_stack_client import LlamaStackClient
from openai import OpenAI

from tools.harness import ServerProcess, StandInControl, start_stack, start_standin, warm_up

# Modules whose tests each start stacks of their own, and share nothing with each other: under
# pytest-xdist their tests are spread over the workers one by one. Every other module's tests run in
# one worker, so that its module-scoped stacks start once.
SPREAD_MODULES = {"test_durability"}
# The longest scenarios start first, so that none of them is left running alone at the end of a run.
LONG_MODULES = (
    "test_dependency_outages",
    "test_workers",
    "test_durability",
    "test_replicas",
    "test_token_quota",
    "test_webhooks",
    "test_multi_user",
    "test_fairness",
)


# First: pytest-xdist reads the xdist_group marks in a hook of its own, after this one.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent

    def start_order(item: pytest.Item) -> int:
        module = Path(item.fspath).stem
        return LONG_MODULES.index(module) if module in LONG_MODULES else len(LONG_MODULES)

    ours = [item for item in items if here in Path(item.fspath).parents]
    for item in ours:
        item.add_marker(pytest.mark.integration)
        module = Path(item.fspath).stem
        if module not in SPREAD_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))
    ours.sort(key=start_order)  # stable: within a module, tests keep their order
    others = [item for item in items if here not in Path(item.fspath).parents]
    items[:] = ours + others


UNGROUPED = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Notice when pytest-xdist ignores the groups: every worker would then start every stack."""
    if not getattr(session.config.option, "loadgroup", False):  # set in pytest-xdist workers only
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            session.config.stash[UNGROUPED] = (
                f"pytest-xdist does not group {item.nodeid} with this pytest (pytest-xdist#1386): install pytest<9.2"
            )
            return


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Failing here rather than in collection: a worker's collection error reaches the terminal
    # as an INTERNALERROR without its message.
    if UNGROUPED in item.config.stash:
        pytest.fail(item.config.stash[UNGROUPED], pytrace=False)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def standin_server(run_dir: Path) -> Iterator[ServerProcess]:
    server = start_standin(run_dir)
    yield server
    server.stop()


@pytest.fixture
def standin(standin_server: ServerProcess) -> Iterator[StandInControl]:
    """The stand-in's controls; its behaviour is reset to instant, clean answers after each test."""
    control = StandInControl(standin_server.url)
    yield control
    control.configure(latency_mean=0, latency_sigma=0, fail_503=0, fail_429=0)


@pytest.fixture(scope="session")
def stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    server = start_stack(run_dir, run_dir / "state", f"{standin_server.url}/v1")
    warm_up(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def openai_client(stack: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def stack_client(stack: ServerProcess) -> LlamaStackClient:
    return LlamaStackClient(base_url=stack.url, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def short_window_stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    """A second stack whose batches expire after 3 seconds."""
    env = {"BATCHES_COMPLETION_WINDOW_SECONDS": "3", "BATCHES_CANCEL_GRACE_SECONDS": "0.5"}
    server = start_stack(run_dir, run_dir / "short-window-state", f"{standin_server.url}/v1", env)
    warm_up(server)
    yield server
    server.stop()


RESILIENCE_ATTEMPTS = 3


@pytest.fixture(scope="session")
def impatient_stack(run_dir: Path, standin_server: ServerProcess) -> Iterator[ServerProcess]:
    """A stack that cuts an attempt off after 5 s and tries each request at most 3 times, quickly."""
    env = {
        "BATCHES_REQUEST_TIMEOUT_SECONDS": "5",
        "BATCHES_MAX_ATTEMPTS": str(RESILIENCE_ATTEMPTS),
        "BATCHES_BACKOFF_INITIAL_SECONDS": "0.05",
        "BATCHES_BACKOFF_MAX_SECONDS": "0.2",
    }
    server = start_stack(run_dir, run_dir / "impatient-state", f"{standin_server.url}/v1", env)
    warm_up(server)
    yield server
    server.stop()
