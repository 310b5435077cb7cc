"""facegate: one-shot face enrolment, 1:1 verification and open-set 1:N identification.

Importing the package does no I/O: models, database and index open in `app.main.create_app`'s lifespan.
"""

__version__ = "0.1.0"
