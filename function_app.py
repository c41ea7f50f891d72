"""The Azure Functions (Python v2) entry point: the HTTP API as one ASGI function.

The auth level is anonymous because the API checks every caller itself (API keys, or App Service
authentication with PKI_AUTH=easyauth); a function key on top would be a second shared secret to hand
to every factory. host.json sets the route prefix to "" since the API's routes carry /api themselves.
"""

import azure.functions as func

from shared.api import create_app

app = func.AsgiFunctionApp(app=create_app(), http_auth_level=func.AuthLevel.ANONYMOUS)
