.PHONY: test pyz clean

test:
	python3 -m pytest -q

# One runnable file: tokenomics.py + pure-Python h11 and PyYAML.
pyz:
	python3 -c "import tokenomics; print(tokenomics.build_zipapp('dist/tokenomics.pyz'))"

clean:
	rm -rf dist build *.egg-info
