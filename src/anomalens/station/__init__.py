"""The inspection station: named, versioned detectors (:mod:`~anomalens.station.models`), a history of every
verdict in a real database (:mod:`~anomalens.station.history`), images kept by content
(:mod:`~anomalens.station.store`), the inspection itself (:mod:`~anomalens.station.inspect`), hot folders
(:mod:`~anomalens.station.watch`), signed webhooks (:mod:`~anomalens.station.webhooks`) and a server with a review
page for many products (:mod:`~anomalens.station.server`).

The history needs SQLAlchemy and Alembic (``pip install 'anomalens[station]'``); PostgreSQL also psycopg.
"""
