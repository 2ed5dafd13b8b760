"""API tokens, ownership and limits, in-process (fast lane): Flask's test client on the
embedded Valkey; jobs are dispatched to its broker list (no worker runs them)."""

from __future__ import annotations

import dataclasses
import io
import threading

import pytest
import redis

from tasks.lifecycle import Lifecycle, QueueFull, new_job_id
from tasks.protocol import Keys

from .conftest import ADMIN, ANN, BOB, TOKENS, bearer, png_bytes
from .conftest import WEBHOOK_SECRET as SECRET


# -- parsing and tickets -------------------------------------------------------------------------
def test_tokens_parse_inline_and_from_a_file(tmp_path):
    from webapp.auth import Tokens

    toks = Tokens.parse(TOKENS)
    assert toks.lookup(ANN).name == "ann" and toks.lookup(ANN).role == "user"
    assert toks.lookup(ADMIN).admin and toks.lookup("nope") is None and toks.lookup(ANN + "x") is None
    path = tmp_path / "tokens"
    path.write_text(f"# the team\nann:{ANN}\n\nroot:{ADMIN}:admin\n")
    from_file = Tokens.parse(f"@{path}")
    assert from_file.lookup(ADMIN).admin and from_file.lookup(BOB) is None
    assert not Tokens.parse("").required and "open" in Tokens.parse("").describe()


@pytest.mark.parametrize("spec, message", [
    ("ann", "entry 1"), (f"ann:{ANN}:root", "entry 1 (ann)"), (f"ann:{ANN},ann:{BOB}", "ann appears twice"),
    (f"ann:{ANN},bob:{ANN}", "bob has the same token"), (f"a b:{ANN}", "entry 1 (?)"),
    ("@/no/such/file", "cannot read"),
])  # fmt: skip
def test_bad_token_specs_name_the_entry_never_the_token(spec, message):
    from webapp.auth import Tokens

    with pytest.raises(ValueError) as exc:
        Tokens.parse(spec)
    assert message in str(exc.value) and ANN not in str(exc.value)


def test_access_tickets_expire_and_cannot_be_forged():
    from webapp.auth import Principal, Tokens

    toks = Tokens.parse(TOKENS)
    ticket, expires = toks.ticket(Principal("ann", "user"), ttl=60, now=1000)
    assert expires == 1060 and toks.redeem(ticket, now=1059) == Principal("ann", "user")
    assert toks.redeem(ticket, now=1061) is None
    name, exp, sig = ticket.split(".")
    assert toks.redeem(f"root.{exp}.{sig}", now=1000) is None  # another name, same signature
    assert toks.redeem(f"ann.{int(exp) + 3600}.{sig}", now=1000) is None  # a longer life
    assert toks.redeem("ann", now=1000) is None and toks.redeem("", now=1000) is None
    assert Tokens.parse(f"ann:{BOB}").redeem(ticket, now=1000) is None  # a rotated token kills its tickets


# -- the app -------------------------------------------------------------------------------------------
@pytest.fixture
def secured(settings):
    s = dataclasses.replace(settings, api_tokens=TOKENS, max_queued_per_token=2, user_max_seconds=3, user_max_steps=10,
                            webhook_allow=("http://127.0.0.1:9/hook",), webhook_secret=SECRET)  # fmt: skip
    from webapp import create_app

    return create_app({"SETTINGS": s, "SWEEPER": False}).test_client()


def submit(client, token: str | None, **fields):
    data = {"image": (io.BytesIO(png_bytes()), "in.png"), "total_second_length": "1", "steps": "2", **fields}
    return client.post("/api/jobs", data=data, headers=bearer(token) if token else {})


ORIGINAL_ROUTES = {"generate", "status", "stream", "result", "download", "input_image", "cancel", "queue", "worker",
                   "loras", "cleanup_jobs", "videos", "video_stream"}  # fmt: skip


def _error(resp, status: int, field: str | None) -> dict:
    assert resp.status_code == status, resp.json
    # the original API's routes also carry FastAPI's "detail" (their blueprint's handlers, webapp/original.py)
    original = resp.request.path.split("/")[1] in ORIGINAL_ROUTES
    assert set(resp.json) == {"error", "field", "errors"} | ({"detail"} if original else set())
    assert resp.json["field"] == field
    return resp.json


def test_no_token_is_401_everywhere_but_the_page_and_probes(secured):
    for method, path in [("get", "/api/jobs"), ("post", "/api/jobs"), ("get", "/api/info"), ("get", "/queue"),
                         ("get", "/api/openapi.json"), ("get", "/status/x"), ("get", "/stream/status/x"),
                         ("post", "/cancel/x"), ("delete", "/api/jobs/x"), ("get", "/ws/jobs"), ("put", "/api/jobs"),
                         ("post", "/api/access"), ("get", "/nope")]:  # fmt: skip
        resp = getattr(secured, method)(path)
        _error(resp, 401, "authorization")
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="framepack"', path
    bad = secured.get("/api/jobs", headers=bearer("nope"))
    _error(bad, 401, "authorization")
    assert 'error="invalid_token"' in bad.headers["WWW-Authenticate"]
    _error(secured.get("/api/jobs", headers={"Authorization": f"Basic {ANN}"}), 401, "authorization")
    for path in ("/", "/jobs/abc", "/static/app.js", "/healthz"):
        assert secured.get(path).status_code == 200, path
    assert secured.get("/readyz").status_code == 503  # open, and honest: no worker
    assert secured.get("/api/jobs", headers=bearer(ANN)).status_code == 200


def test_a_user_sees_only_its_own_jobs_and_others_are_404(secured):
    a = submit(secured, ANN).json
    b = submit(secured, BOB).json
    assert a["owner"] == "ann" and b["owner"] == "bob"
    for path in (f"/api/jobs/{b['id']}", f"/api/jobs/{b['id']}/input", f"/api/jobs/{b['id']}/video"):
        _error(secured.get(path, headers=bearer(ANN)), 404, "job_id")
    _error(secured.post(f"/api/jobs/{b['id']}/cancel", headers=bearer(ANN)), 404, "job_id")
    # the original API's routes answer as the original does for a job it does not have
    assert secured.get(f"/status/{b['id']}", headers=bearer(ANN)).json == {"detail": "Job not found"}
    assert secured.post(f"/cancel/{b['id']}", headers=bearer(ANN)).json == {"detail": "Job not found"}
    assert secured.get(f"/result/{b['id']}", headers=bearer(ANN)).status_code == 404
    assert secured.get(f"/input_image/{b['id']}", headers=bearer(ANN)).status_code == 404
    sse = secured.get(f"/stream/status/{b['id']}", headers=bearer(ANN)).get_data(as_text=True)
    assert "Job not found" in sse and b["id"] not in sse
    assert secured.get(f"/status/{b['id']}", headers=bearer(BOB)).json["status"] == "pending"
    _error(secured.delete(f"/api/jobs/{b['id']}", headers=bearer(ANN)), 404, "job_id")
    assert secured.get(f"/api/jobs/{b['id']}", headers=bearer(BOB)).json["state"] == "queued"  # untouched
    listing = secured.get("/api/jobs", headers=bearer(ANN)).json
    assert [j["id"] for j in listing["jobs"]] == [a["id"]] and listing["total"] == 1
    assert [(j["job_id"], j["status"]) for j in secured.get("/queue", headers=bearer(ANN)).json["queue"]] == [
        (a["id"], "pending")]  # fmt: skip
    assert [j["job_id"] for j in secured.get("/queue", headers=bearer(BOB)).json["queue"]] == [b["id"]]
    assert [(j["id"], j["position"]) for j in secured.get("/api/jobs", headers=bearer(BOB)).json["jobs"]] == [
        (b["id"], 2)]  # its place in the whole queue  # fmt: skip
    _error(secured.get("/api/jobs?owner=bob", headers=bearer(ANN)), 403, "owner")
    assert secured.get("/api/jobs?owner=ann", headers=bearer(ANN)).json["total"] == 1


def test_an_admin_sees_cancels_and_deletes_every_job(secured):
    b = submit(secured, BOB).json
    submit(secured, ANN)
    assert secured.get("/api/jobs", headers=bearer(ADMIN)).json["total"] == 2
    assert [j["id"] for j in secured.get("/api/jobs?owner=bob", headers=bearer(ADMIN)).json["jobs"]] == [b["id"]]
    assert len(secured.get("/queue", headers=bearer(ADMIN)).json["queue"]) == 2
    assert secured.post(f"/api/jobs/{b['id']}/cancel", headers=bearer(ADMIN)).json["state"] == "cancelled"
    assert secured.delete(f"/api/jobs/{b['id']}", headers=bearer(ADMIN)).status_code == 204
    _error(secured.get(f"/api/jobs/{b['id']}", headers=bearer(BOB)), 404, "job_id")


def test_over_the_queued_limit_is_429_with_retry_after_and_nothing_stored(secured, valkey_url):
    r = redis.Redis.from_url(valkey_url)
    first, _ = submit(secured, ANN).json, submit(secured, ANN)
    before = (r.zcard(Keys.JOBS), r.llen("gpu"), r.dbsize())
    resp = submit(secured, ANN)
    body = _error(resp, 429, "queue")
    assert int(resp.headers["Retry-After"]) > 0 and "2 queued jobs" in body["error"]
    assert (r.zcard(Keys.JOBS), r.llen("gpu"), r.dbsize()) == before
    assert submit(secured, BOB).status_code == 202  # another token has its own allowance
    legacy = {"image": (io.BytesIO(png_bytes()), "a.png"), "video_length": "1", "steps": "2"}
    refused = secured.post("/generate", data=legacy, headers=bearer(ANN))  # the original API: FastAPI's shape
    assert refused.status_code == 429 and "2 queued jobs" in refused.json["detail"]
    assert int(refused.headers["Retry-After"]) > 0
    secured.post(f"/api/jobs/{first['id']}/cancel", headers=bearer(ANN))  # a place frees up
    assert submit(secured, ANN).status_code == 202


def test_a_batch_belongs_to_its_token_and_stops_at_the_queue_limit(secured, valkey_url):
    import base64

    image = base64.b64encode(png_bytes()).decode()
    body = {"defaults": {"total_second_length": 1, "steps": 2}, "jobs": [{"image": image}] * 3}
    resp = secured.post("/api/batches", json=body, headers=bearer(ANN))
    assert resp.status_code == 202
    batch = resp.json
    # two places in ann's allowance: two jobs run, the third entry is refused with the reason
    assert batch["owner"] == "ann" and batch["total"] == 2
    assert [(e["index"], e["field"]) for e in batch["errors"]] == [(2, "queue")]
    assert all(secured.get(f"/api/jobs/{j['id']}", headers=bearer(ANN)).json["owner"] == "ann" for j in batch["jobs"])
    r = redis.Redis.from_url(valkey_url)
    jobs_before = r.zcard(Keys.JOBS)
    _error(secured.post("/api/batches", json=body, headers=bearer(ANN)), 429, "queue")  # no place: nothing stored
    assert r.zcard(Keys.JOBS) == jobs_before == 2
    for path in (f"/api/batches/{batch['id']}",):
        _error(secured.get(path, headers=bearer(BOB)), 404, "batch_id")
    _error(secured.post(f"/api/batches/{batch['id']}/cancel", headers=bearer(BOB)), 404, "batch_id")
    assert secured.get(f"/api/batches/{batch['id']}", headers=bearer(ADMIN)).json["total"] == 2


def test_concurrent_submits_cannot_both_take_the_last_place(settings, valkey_url):
    s = dataclasses.replace(settings, max_queued_per_token=3)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def one() -> None:
        lc = Lifecycle(redis.Redis.from_url(valkey_url), s)
        barrier.wait()
        try:
            lc.submit(new_job_id(), {}, "tiny", b"png", None, owner="ann")
            results.append("ok")
        except QueueFull as exc:
            results.append(exc.scope)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["ok"] * 3 + ["token"] * 5
    assert redis.Redis.from_url(valkey_url).zcard(Keys.owner_queued("ann")) == 3


def test_the_whole_queue_has_a_limit_too(settings, valkey_url):
    from webapp import create_app

    client = create_app({"SETTINGS": dataclasses.replace(settings, max_queue=1), "SWEEPER": False}).test_client()
    assert submit(client, None).status_code == 202
    resp = submit(client, None)
    _error(resp, 503, "queue")
    assert resp.headers["Retry-After"]


def test_role_limits_name_the_field(secured):
    _error(submit(secured, ANN, total_second_length="4"), 422, "total_second_length")
    _error(submit(secured, ANN, steps="11"), 422, "steps")
    legacy = secured.post("/generate", data={"image": (io.BytesIO(png_bytes()), "a.png"), "video_length": "5",
                                             "steps": "50"}, headers=bearer(ANN))  # fmt: skip
    # the original API has no bounds: the role's limits clamp like its other ranges, and say so
    assert legacy.status_code == 200
    assert legacy.json["adjusted"] == {"video_length": {"requested": 5.0, "used": 3}, "steps": {"requested": 50,
                                                                                               "used": 10}}
    params = secured.get(f"/api/jobs/{legacy.json['job_id']}", headers=bearer(ANN)).json["params"]
    assert (params["total_second_length"], params["steps"]) == (3, 10)
    assert submit(secured, ADMIN, total_second_length="4", steps="11").status_code == 202  # admins: the schema's


def test_webhooks_are_checked_at_submit(secured, settings):
    _error(submit(secured, ANN, webhook="http://127.0.0.1:9/other"), 400, "webhook")
    _error(submit(secured, ANN, webhook="http://169.254.169.254/latest/"), 400, "webhook")
    _error(submit(secured, ANN, webhook_events="start"), 400, "webhook_events")
    _error(submit(secured, ANN, webhook="http://127.0.0.1:9/hook", webhook_events="start,done"), 422, "webhook_events")
    job = submit(secured, ANN, webhook="http://127.0.0.1:9/hook/a", webhook_events=["section", "start"]).json
    assert job["webhook"] == {"url": "http://127.0.0.1:9/hook/a", "events": ["start", "section"], "deliveries": []}
    assert submit(secured, ANN, webhook="http://127.0.0.1:9/hook").json["webhook"]["events"] == ["completed"]
    from webapp import create_app

    closed = create_app({"SETTINGS": settings, "SWEEPER": False}).test_client()  # no FRAMEPACK_WEBHOOK_ALLOW
    body = _error(submit(closed, None, webhook="http://127.0.0.1:9/hook"), 400, "webhook")
    assert "not enabled" in body["error"]


def test_access_tickets_open_reads_only(secured):
    job = submit(secured, ANN).json
    ticket = secured.post("/api/access", headers=bearer(ANN)).json
    assert ticket["name"] == "ann" and ticket["ttl"] == 900 and ticket["access"].startswith("ann.")
    q = f"?access={ticket['access']}"
    assert secured.get(f"/api/jobs/{job['id']}{q}").status_code == 200
    assert secured.get(f"/api/jobs/{job['id']}/input{q}").mimetype == "image/png"
    _error(secured.post(f"/api/jobs/{job['id']}/cancel{q}"), 401, "access")
    _error(secured.get(f"/api/jobs/{job['id']}?access=ann.1.forged"), 401, "access")
    bob = secured.post("/api/access", headers=bearer(BOB)).json["access"]
    _error(secured.get(f"/api/jobs/{job['id']}?access={bob}"), 404, "job_id")  # a ticket is its owner, no more


def test_info_says_who_you_are_and_keeps_the_settings_for_admins(secured):
    info = secured.get("/api/info", headers=bearer(ANN)).json
    assert info["auth"] == {"required": True, "name": "ann", "role": "user"}
    assert info["limits"]["max_seconds"] == 3 and info["limits"]["max_queued"] == 2 and info["limits"]["webhooks"]
    assert "settings" not in info and "workers" not in info
    admin = secured.get("/api/info", headers=bearer(ADMIN)).json
    assert admin["settings"]["api_tokens"] == "***" and ANN not in str(admin) and "workers" in admin


def test_without_tokens_everything_is_open_as_before(settings):
    from webapp import create_app

    client = create_app({"SETTINGS": settings, "SWEEPER": False}).test_client()
    job = submit(client, None).json
    assert job["owner"] is None and client.get(f"/api/jobs/{job['id']}").status_code == 200
    info = client.get("/api/info").json
    assert info["auth"] == {"required": False, "name": "anonymous", "role": "admin"} and "settings" in info
    assert client.post("/api/access").json["access"] is None
    assert "securitySchemes" not in client.get("/api/openapi.json").json["components"]


def test_the_feed_filter_keeps_other_owners_jobs_out():
    from webapp.auth import Principal
    from webapp.outbox import Item, Outbox

    ann = Principal("ann", "user")
    box = Outbox(accept=lambda item: ann.may_see(item.data.get("owner")))
    for owner in ("ann", "bob", None, "ann"):
        box.put(Item("jobs", 0, "{}", None, {"owner": owner}))
    assert [box.get(0).data["owner"], box.get(0).data["owner"], box.get(0)] == ["ann", "ann", None]
