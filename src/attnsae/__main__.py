from attnsae.cli import main

main()
