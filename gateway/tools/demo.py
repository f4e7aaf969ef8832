"""`gateway demo`: the reference simulated fleet and a gateway in front of it, in one process (`make run`)."""

from __future__ import annotations

import sys

from aiohttp import web

from gateway.http.app import create_app, serve
from gateway.settings import Settings
from gateway.sim import start_sim
from gateway.sim.reference import REFERENCE_SIMS, reference_fleet

SIMS = web.AppKey("sims", list)


def run_demo(settings: Settings, sim_port: int) -> int:
    ports = {name: sim_port + i for i, name in enumerate(REFERENCE_SIMS)}

    async def start_sims(app: web.Application) -> None:
        app[SIMS] = []
        for name, cfg in REFERENCE_SIMS.items():
            runner, _ = await start_sim(cfg, "127.0.0.1", ports[name])
            app[SIMS].append(runner)
            print(f"simulated upstream {name} on http://127.0.0.1:{ports[name]}/v1", flush=True)

    async def stop_sims(app: web.Application) -> None:
        for r in app[SIMS]:
            await r.cleanup()

    app = create_app(settings, reference_fleet(ports))
    app.on_startup.insert(0, start_sims)
    app.on_cleanup.append(stop_sims)
    print("try: curl -s localhost:%d/v1/chat/completions -H 'Content-Type: application/json' "
          "-d '{\"model\":\"fleet-model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'" % settings.port, flush=True)
    try:
        serve(app, settings)
    except OSError as e:
        print(f"gateway demo: {e.strerror or e} — is another demo or gateway running? "
              f"(choose other ports with --port / --sim-port)", file=sys.stderr)
        return 2
    return 0
