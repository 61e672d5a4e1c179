"""Schemathesis hooks for tests/openapi.rs: a check that a refused call changed nothing.

Before each call the state the admin API shows (traffic, both colors, the release, the audit
log) is read; after a refused answer (400, 401, 404, 409) it is read again and must be the same.
Calls made while a release or a deploy runs in the background are not judged: the state moves
on its own then. Runs with one worker, so a snapshot belongs to the call that follows it.
"""

import json
import os
import urllib.request

import schemathesis

BASE = os.environ["BLUEGREEN_ADMIN_URL"]
TOKEN = os.environ["BLUEGREEN_ADMIN_TOKEN"]
REFUSED = {400, 401, 404, 409}

before = None
judged = 0
skipped = 0


def get(path):
    request = urllib.request.Request(BASE + path, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def state():
    """What a call could change; counters, health and timings move by themselves."""
    status = get("/v1/status")
    events = get("/v1/history?limit=10000")["events"]
    environments = [
        {
            key: env.get(key)
            for key in ("color", "version", "status", "upstreams", "extra_env", "provider", "reason")
        }
        for env in status["environments"]
    ]
    release = status["release"]
    return {
        "live": status["live"],
        "weights": status["weights"],
        "rollback_to": status["rollback_to"],
        "split": status["split"],
        "upstreams": {
            c["color"]: sorted(u["address"] for u in c["upstreams"]) for c in status["colors"]
        },
        "environments": environments,
        "release": release and {k: release[k] for k in ("id", "state", "step", "percent", "paused")},
        "releases": [r["id"] for r in get("/v1/releases?limit=1000")["releases"]],
        "events": len(events),
        "last_event": events[-1] if events else None,
    }


def busy(snapshot):
    return snapshot["release"] is not None or any(
        env["status"] == "deploying" for env in snapshot["environments"]
    )


@schemathesis.hook
def before_call(context, case, kwargs):
    global before
    before = state()


@schemathesis.check
def no_state_change_on_refusal(ctx, response, case):
    global judged, skipped
    if response.status_code not in REFUSED:
        return None
    if before is None or busy(before):
        skipped += 1
        return None
    after = state()
    if after != before:
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        raise AssertionError(
            f"{case.method} {case.formatted_path} was refused ({response.status_code}) "
            f"but the state changed: {json.dumps(changed)}"
        )
    judged += 1
    # The count, for the test to tell a check that ran from one that was never registered.
    if "BLUEGREEN_JUDGED_FILE" in os.environ:
        with open(os.environ["BLUEGREEN_JUDGED_FILE"], "w") as file:
            file.write(f"{judged} judged, {skipped} skipped while busy\n")
    return None
