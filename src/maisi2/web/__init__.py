"""`maisi2 serve`: a local web app over the package (masks in, tumour edits, generation jobs, results).

`workspace` holds every action as a Python function, `jobs` the one-at-a-time generation queue,
`app` the FastAPI routes over them, `static/` the page (plain HTML, CSS and a small canvas slice
viewer of our own; nothing is fetched from outside at run time).
"""
