"""The SSE gateway: fans the feeds' Redis streams out to subscribers over Server-Sent Events.

Modules: settings (GatewaySettings), app (Starlette app + lifespan), hub (one reader per
feed stream, shared frames), subscriber (one client's stream: catch-up then live),
history (reads behind the live position: Redis XRANGE and the Postgres catalogue),
cursor (the `id:` of every event), metrics, auth and lookup (access control, read-only
endpoints), static/ (the page at `/`).
"""
