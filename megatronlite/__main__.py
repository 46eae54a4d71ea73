from megatronlite.cli import main

main()
