"""The admin page and its JSON API (SPEC §11): `api.AdminApp` is the handler the Router gives
every /admin target; the page itself is package data under `assets/`."""
