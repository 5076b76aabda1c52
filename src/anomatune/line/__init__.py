"""anomatune on a production line: a hot folder in, verdicts out over MQTT, every inspection in a database."""
