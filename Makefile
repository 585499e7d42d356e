.PHONY: test pyz clean

test:
	python3 -m pytest -q

# One runnable file: the tokenomics package + pure-Python h11 and PyYAML.
pyz:
	python3 -c "from tokenomics.cli import build_zipapp; print(build_zipapp('dist/tokenomics.pyz'))"

clean:
	rm -rf dist build *.egg-info
