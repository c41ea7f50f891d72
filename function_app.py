"""The Azure Functions (Python v2) entry point: the HTTP API as one ASGI function, and the batch queue's
functions (shared/batch_functions.py) on the same app and the same service.

The auth level is anonymous because the API checks every caller itself (API keys, or App Service
authentication with PKI_AUTH=easyauth); a function key on top would be a second shared secret to hand
to every factory. host.json sets the route prefix to "" since the API's routes carry /api themselves.
"""

import azure.functions as func

from shared.api import create_app
from shared.batch_functions import batch_functions

api = create_app()
app = func.AsgiFunctionApp(app=api, http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(batch_functions(api.state.service))
