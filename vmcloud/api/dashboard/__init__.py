"""The web dashboard the API serves under /dashboard (``views.router``)."""
