"""The managed-job domain shared by the API and the worker: settings, job tables, services, artifact storage."""
