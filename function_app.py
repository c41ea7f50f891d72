"""The Azure Functions (Python v2) entry point.

Each function is a few lines that call the service in `shared.service`. The HTTP API, the queue-triggered
batch signer and the expiry timer are added here as they are built.
"""

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
