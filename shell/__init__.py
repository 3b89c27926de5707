"""The application shell: the ``pcq`` command line, the standalone supervisor, the helpers that
start the service's own processes, and the HTTP client of pcq's API with its progress bar. The top
of the import graph: it may import api, worker, mock_upstream, migrations and the core (pcq);
nothing imports it but tests and ops."""
