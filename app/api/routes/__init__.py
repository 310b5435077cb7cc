"""One router per resource; `app.api.main` assembles them."""
