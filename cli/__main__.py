from lmjobs.cli.main import main

main()
