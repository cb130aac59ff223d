"""The OpenAPI 3.1 document served at /openapi.json, written by hand.

tests/test_http_api.py checks that every route app.py serves is described here.
"""

from __future__ import annotations

from typing import Any

from smtpgate import __version__
from smtpgate.spool.base import JobAction, JobState, RecipientState
from smtpgate.web.api import PAGE_DEFAULT, PAGE_MAX

_RECIPIENT_STATES = [s.value for s in RecipientState]
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "The job's name (URL-encoded: names may hold spaces, @, + and :).",
    "schema": {"type": "string"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _text(media: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


_UNAUTHORIZED = {"401": _error("A token is configured and the request did not give it.")}
_NO_JOB = {"404": _error("No such job.")}
_NOT_APPLICABLE = {"409": _error("The action does not apply to the job in its state.")}
_CHANGED = {"200": _json(_ref("Changed"), "What the action changed, and the job now.")}

_CONTROL_TEXT = {
    JobAction.CANCEL: "Cancel every unsent recipient; what went out stays delivered. A"
    " cancelled job takes no more mail.",
    JobAction.PAUSE: "Send nothing more until resumed.",
    JobAction.RESUME: "Go on sending a paused job.",
    JobAction.RELEASE: "Send a held job, within its route's window and rate.",
}


def _control(action: JobAction) -> dict[str, Any]:
    return {
        "post": {
            "summary": _CONTROL_TEXT[action],
            "operationId": f"{action.value}Job",
            "parameters": [_NAME],
            "responses": {**_CHANGED, **_UNAUTHORIZED, **_NO_JOB, **_NOT_APPLICABLE},
        }
    }


_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What went wrong."}},
    },
    "Job": {
        "type": "object",
        "description": "As `smtpgate jobs --json` gives it.",
        "properties": {
            "name": {"type": "string"},
            "route": {"type": "string"},
            "state": {"enum": [s.value for s in JobState]},
            "waiting": {
                "type": ["string", "null"],
                "description": "Why an unfinished job is not sending now, and until when.",
            },
            "total": {"type": "integer"},
            "counts": {
                "type": "object",
                "description": "Recipients by state.",
                "properties": {s: {"type": "integer"} for s in _RECIPIENT_STATES},
            },
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "finished_at": {"type": ["string", "null"], "format": "date-time"},
            "send_at": {"type": ["string", "null"], "format": "date-time"},
            "submitted_by": {"type": ["string", "null"]},
        },
    },
    "JobDetail": {
        "description": "As `smtpgate job show --json` gives it.",
        "allOf": [
            _ref("Job"),
            {
                "type": "object",
                "properties": {
                    "top_failures": {
                        "type": "array",
                        "description": "The most common last replies of failed recipients.",
                        "items": {
                            "type": "object",
                            "properties": {
                                "reply": {"type": "string"},
                                "count": {"type": "integer"},
                            },
                        },
                    }
                },
            },
        ],
    },
    "Recipient": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "description": "The key for `after`."},
            "queue_id": {"type": "string"},
            "address": {"type": "string"},
            "route": {"type": "string"},
            "state": {"enum": _RECIPIENT_STATES},
            "attempts": {"type": "integer"},
            "updated_at": {"type": "string", "format": "date-time"},
            "via": {"type": ["string", "null"]},
            "last_reply": {"type": ["string", "null"]},
        },
    },
    "RecipientPage": {
        "type": "object",
        "properties": {
            "job": {"type": "string"},
            "state": {"type": ["string", "null"]},
            "recipients": {"type": "array", "items": _ref("Recipient")},
            "next_after": {
                "type": ["integer", "null"],
                "description": "Give as `after` for the next page; null on the last page.",
            },
        },
    },
    "Changed": {
        "type": "object",
        "properties": {"changed": {"type": "integer"}, "job": _ref("Job")},
    },
    "Queue": {
        "type": "object",
        "properties": {
            "recipients": {"type": "object", "description": "Recipients by state."},
            "jobs": {"type": "object", "description": "Jobs by state."},
            "relays": {
                "type": "object",
                "description": "Relays that are slowed down, with why and since when.",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "string"},
                        "since": {"type": "string", "format": "date-time"},
                    },
                },
            },
            "spool_bytes": {"type": "integer"},
        },
    },
    "Status": {"type": "object", "properties": {"status": {"const": "ok"}}},
}


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/api/jobs": {
            "get": {
                "summary": "Every job with its counts, newest first.",
                "operationId": "listJobs",
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Job")}, "The jobs."),
                    **_UNAUTHORIZED,
                },
            }
        },
        "/api/jobs/{name}": {
            "get": {
                "summary": "One job, with its most common failures.",
                "operationId": "showJob",
                "parameters": [_NAME],
                "responses": {
                    "200": _json(_ref("JobDetail"), "The job."),
                    **_UNAUTHORIZED,
                    **_NO_JOB,
                },
            }
        },
        "/api/jobs/{name}/recipients": {
            "get": {
                "summary": "A page of the job's recipients in id order.",
                "operationId": "jobRecipients",
                "parameters": [
                    _NAME,
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"enum": _RECIPIENT_STATES},
                        "description": "Only recipients in this state.",
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "default": 0},
                        "description": "The `next_after` of the page before.",
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "default": PAGE_DEFAULT},
                        "description": f"Recipients in the page; at most {PAGE_MAX}.",
                    },
                ],
                "responses": {
                    "200": _json(_ref("RecipientPage"), "A page."),
                    "400": _error("A bad state, after or limit."),
                    **_UNAUTHORIZED,
                    **_NO_JOB,
                },
            }
        },
        **{f"/api/jobs/{{name}}/{a.value}": _control(a) for a in _CONTROL_TEXT},
        "/api/jobs/{name}/retry": {
            "post": {
                "summary": "Deferred recipients are due now; with failed=true, failed ones"
                " are queued once more too.",
                "operationId": "retryJob",
                "parameters": [
                    _NAME,
                    {"name": "failed", "in": "query", "schema": {"type": "boolean"}},
                ],
                "responses": {**_CHANGED, **_UNAUTHORIZED, **_NO_JOB},
            }
        },
        "/api/jobs/{name}/schedule": {
            "post": {
                "summary": "Send nothing of the job before a time; null: send now.",
                "operationId": "scheduleJob",
                "parameters": [_NAME],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["send_at"],
                                "properties": {
                                    "send_at": {
                                        "type": ["string", "null"],
                                        "description": "RFC 3339 with a zone, e.g."
                                        " 2026-12-01T09:00:00+01:00",
                                    }
                                },
                            }
                        }
                    },
                },
                "responses": {
                    **_CHANGED,
                    "400": _error("Not JSON, or not a date smtpgate can read."),
                    **_UNAUTHORIZED,
                    **_NO_JOB,
                },
            }
        },
        "/api/queue": {
            "get": {
                "summary": "Recipients and jobs by state, slowed-down relays, spool size.",
                "operationId": "queue",
                "responses": {"200": _json(_ref("Queue"), "The queue."), **_UNAUTHORIZED},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "operationId": "openapi",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics: recipients and jobs by state, results since"
                " start, spool size.",
                "operationId": "metrics",
                "responses": {
                    "200": _text("text/plain", "Prometheus text format."),
                    **_UNAUTHORIZED,
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process answers (liveness); no token needed.",
                "operationId": "healthz",
                "security": [],
                "responses": {"200": _json(_ref("Status"), "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "The spool answers a read (readiness); no token needed.",
                "operationId": "readyz",
                "security": [],
                "responses": {
                    "200": _json(_ref("Status"), "Ready."),
                    "503": _error("The spool does not answer."),
                },
            }
        },
        "/": {
            "get": {
                "summary": "The web page: every job with its progress.",
                "operationId": "jobsPage",
                "responses": {"200": _text("text/html", "The page.")},
            }
        },
        "/jobs/{name}": {
            "get": {
                "summary": "The web page of one job: statistics, failures, recipients.",
                "operationId": "jobPage",
                "parameters": [_NAME],
                "responses": {
                    "200": _text("text/html", "The page."),
                    "404": _text("text/html", "No such job."),
                },
            }
        },
        "/static/app.js": {
            "get": {
                "summary": "The page's script.",
                "operationId": "script",
                "security": [],
                "responses": {"200": _text("text/javascript", "The script.")},
            }
        },
        "/static/style.css": {
            "get": {
                "summary": "The page's style.",
                "operationId": "style",
                "security": [],
                "responses": {"200": _text("text/css", "The style.")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "smtpgate",
            "version": __version__,
            "description": "Watch and control smtpgate's jobs. With [http] token_env or"
            " token_file set, every request but /healthz, /readyz and /static needs"
            " Authorization: Bearer TOKEN.",
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],  # required only when a token is configured
    }
