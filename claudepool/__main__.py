from claudepool.cli import main

main()
