"""``mlflow ui --app-name mmrepro``: MLflow's own server, whose pages open on training runs.

MLflow 3.17's UI chooses every experiment's first page from one switch at the top of its sidebar,
"GenAI" or "Model training", kept in the browser (``localStorage["mlflow.workflowType_v1"]``,
overridden by a ``?workflowType=`` URL parameter); a browser that never chose gets GenAI, whose
overview (traces, token usage) is empty for these runs. No experiment tag or server option sets
it (``mlflow.experimentKind`` is not read while that switch exists). This app, registered under
MLflow's ``mlflow.app`` entry points, serves MLflow's page with one line that makes "Model
training" the choice of a browser that has none; a choice the user makes in the switch stands.
Everything else is MLflow's server unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: The browser's saved switch (MLflow's ``useLocalStorage`` key ``mlflow.workflowType``, version 1, JSON).
WORKFLOW_KEY, TRAINING_RUNS = "mlflow.workflowType_v1", "machine_learning"
DEFAULT_SWITCH = ("<script>try{if(localStorage.getItem(%s)===null)localStorage.setItem(%s,%s)}catch(e){}</script>"
                  % (json.dumps(WORKFLOW_KEY), json.dumps(WORKFLOW_KEY), json.dumps(json.dumps(TRAINING_RUNS))))


def index_page(html: str) -> str:
    """MLflow's index.html with the default switch set first thing in its head (before the app's scripts)."""
    if "<head>" not in html:
        raise ValueError("MLflow's index.html has no <head>; this MLflow version is not one mmrepro.mlflow_ui knows")
    return html.replace("<head>", "<head>" + DEFAULT_SWITCH, 1)


def create_app() -> Any:
    """The app factory ``mlflow ui/server --app-name mmrepro`` calls: MLflow's app, its page served by :func:`index_page`."""
    from flask import Response
    from mlflow.server import app as flask_app

    page = index_page((Path(flask_app.static_folder) / "index.html").read_text())
    flask_app.view_functions["serve"] = lambda: Response(page, mimetype="text/html")
    if os.environ.get("_MLFLOW_SGI_NAME") == "uvicorn":  # MLflow's default server wraps Flask in FastAPI
        from mlflow.server.fastapi_app import app

        return app
    return flask_app
