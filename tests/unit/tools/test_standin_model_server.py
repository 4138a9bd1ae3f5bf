"""The stand-in model server's bookkeeping for benchmarks: seeded draws and a timeline."""

from starlette.testclient import TestClient

from tools.standin_model_server import Behaviour, StandIn, build_app


def chat(client: TestClient, n: int) -> None:
    body = {"model": "m-chat", "messages": [{"role": "user", "content": f"q{n}"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_a_reset_with_a_seed_replays_the_same_latencies_and_starts_a_new_timeline() -> None:
    client = TestClient(build_app(StandIn(Behaviour(latency_mean=0.001, latency_sigma=0.6), seed=1), ("m-chat",)))
    runs = []
    for _ in range(2):
        client.post("/admin/reset", json={"seed": 7})
        assert client.get("/admin/stats").json()["first_request_at"] is None
        for n in range(5):
            chat(client, n)
        stats = client.get("/admin/stats", params={"latencies": "1"}).json()
        assert stats["first_request_at"] <= stats["last_response_at"]
        runs.append(stats["latencies"])
    assert runs[0] == runs[1] and len(runs[0]) == 5 and len(set(runs[0])) == 5
    client.post("/admin/reset")  # no seed: the draws go on
    chat(client, 0)
    assert client.get("/admin/stats", params={"latencies": "1"}).json()["latencies"] != runs[0][:1]
    assert "latencies" not in client.get("/admin/stats").json()
