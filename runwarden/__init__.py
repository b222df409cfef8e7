"""Client-side helpers for programs that talk to a Runwarden over HTTP (``runwarden.client``).
Nothing here imports Django or the server's code: an outside agent installs only this."""
