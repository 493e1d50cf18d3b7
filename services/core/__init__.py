"""Shared runtime used by every Azora service: settings, logging, errors, auth, storage, server."""
